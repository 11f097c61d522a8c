# llama_1m: a 4-layer LLaMA (RMSNorm, RoPE, SwiGLU) of width 128, on shakespeare_char.
# Everything else is train.py's default (see gpt_800k.py): the same work as the small GPTs.
arch = 'llama'
n_embd = 128
out_dir = 'out-llama_1m'
