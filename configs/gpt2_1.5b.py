# gpt2_1.5b: GPT-2 XL (48 layers, 25 heads, 1600 wide, 1024 tokens) on OpenWebText.
# gpt2_124m.py's recipe with this shape and GPT-3's learning rate for the size.
# Over 1B: FSDP shards weights and optimizer state across GPUs (--fsdp=True, see README).
include("gpt2_124m.py")
batch_size = 12
n_layer = 48
n_head = 25
n_embd = 1600
learning_rate = 2e-4
min_lr = 2e-5
out_dir = 'out-gpt2_1.5b'
wandb_run_name = 'gpt2-1.5b'
