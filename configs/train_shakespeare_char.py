# train_shakespeare_char: nanoGPT's shakespeare_char recipe, key for key (gpt_10m.py uses it).
# nanoGPT's commands run here unchanged:
#   python train.py configs/train_shakespeare_char.py                      # GPU: 10.65M params
#   python train.py configs/train_shakespeare_char.py --device=cpu --compile=False \
#     --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 \
#     --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0   # CPU: 0.80M params
# Add --bitlinear=False for the float model of the same shape.

out_dir = 'out-shakespeare-char'
eval_interval = 250  # frequent, because this small model overfits
eval_iters = 200
log_interval = 10

always_save_checkpoint = False  # save only when val improves

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

# a baby GPT: 6 layers, 6 heads, 384 wide
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small network can take a higher rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit larger, as tokens per step are few
optimizer = 'adamw'  # nanoGPT's optimizer and schedule, so its numbers repeat here
lr_schedule = 'cosine'

warmup_iters = 100
