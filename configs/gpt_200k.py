# gpt_200k: a GPT of 4 layers, width 64, on shakespeare_char.
# Everything else is train.py's default, as in gpt_800k.py: the same work for every small config.
n_embd = 64
out_dir = 'out-gpt_200k'
