# llama_50k: a 3-layer LLaMA (RMSNorm, RoPE, SwiGLU) of width 32, on shakespeare_char.
# Everything else is train.py's default (see gpt_800k.py): the same work as the small GPTs.
arch = 'llama'
n_embd = 32
n_layer = 3
out_dir = 'out-llama_50k'
