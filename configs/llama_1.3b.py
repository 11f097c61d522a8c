# llama_1.3b: the BitNet b1.58 paper's 1.3B shape (24 layers, 2048 wide, MLP 5632, 32 heads).
# (The paper's MLP width is 5460; 5632 is a multiple of 256, as GGUF export needs.)
# llama_700m.py's recipe with this shape and the paper's learning rate; batch 4 x 128 steps.
include("llama_700m.py")
batch_size = 4
gradient_accumulation_steps = 128
n_head = 32
n_embd = 2048
ffn_hidden = 5632
learning_rate = 1.2e-3
out_dir = 'out-llama_1.3b'
wandb_run_name = 'llama-1.3b'
