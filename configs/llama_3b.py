# llama_3b: the BitNet b1.58 paper's 3B shape (26 layers, 3200 wide, MLP 8640, 32 heads).
# More than one 80 GB GPU holds unsharded: train it with FSDP (--fsdp=True, see README).
include("llama_700m.py")
batch_size = 4
gradient_accumulation_steps = 128
n_layer = 26
n_head = 32
n_embd = 3200
ffn_hidden = 8640
learning_rate = 1.2e-3
out_dir = 'out-llama_3b'
wandb_run_name = 'llama-3b'
