# gpt2_124m: GPT-2 small (12 layers, 12 heads, 768 wide, 1024 tokens) on OpenWebText.
# nanoGPT's train_gpt2.py recipe: 12 x 1024 tokens x 40 accumulation steps = 491,520 tokens a
# step, 600k steps (~300B tokens). On 8 GPUs:
#   torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py
# The ternary model uses the float recipe's learning rate, its BitLinear weights at 4x
# (bit_lr_scale); untuned at this size.
dataset = 'openwebtext'
block_size = 1024
batch_size = 12
gradient_accumulation_steps = 5 * 8
n_layer = 12
n_head = 12
n_embd = 768
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 600000
lr_decay_iters = 600000
warmup_iters = 2000
weight_decay = 1e-1
beta2 = 0.95
optimizer = 'adamw'  # nanoGPT's optimizer and schedule
lr_schedule = 'cosine'
eval_interval = 1000
eval_iters = 200
log_interval = 10
out_dir = 'out-gpt2_124m'
wandb_project = 'owt'
wandb_run_name = 'gpt2-124m'
