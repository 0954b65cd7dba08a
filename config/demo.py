# The shell game on a laptop CPU in about ten minutes: python prepare_data.py && python train.py config/demo.py
out_dir = "out-demo"
dataset = "shellgame"
block_size = 32          # rows are 17 tokens; room for the longer test games (up to 24 swaps)
batch_size = 64
n_embd = 64
n_head = 2
intermediate_size = 160
n_prelude = 1
n_core = 1
n_coda = 1
mean_recurrence = 5      # mean depth 6: the game is learned, and 8 iterations saturate it (6 needs ~16 at n=16)
backprop_depth = 4
learning_rate = 3e-3
min_lr = 3e-4
max_iters = 13000
warmup_iters = 390
lr_decay_iters = 13000
weight_decay = 0.1
eval_interval = 1000
eval_iters = 10
log_interval = 100
device = "cpu"
