# gpt_50k: the smallest GPT: 4 layers of width 32, on shakespeare_char.
# Everything else is train.py's default, as in gpt_800k.py: the same work for every small config.
n_embd = 32
out_dir = 'out-gpt_50k'
