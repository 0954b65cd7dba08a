# A character-level model of Tiny Shakespeare on a laptop CPU (nanoGPT's baby model, recurrent).
# python prepare_data.py --dataset=shakespeare --tokenizer=char  (or --input=your.txt --tokenizer=char --name=...)
# python train.py config/shakespeare_char.py
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
block_size = 256
batch_size = 32
n_embd = 256
n_head = 4
intermediate_size = 704
n_prelude = 1
n_core = 2
n_coda = 1
mean_recurrence = 8
backprop_depth = 4
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 100
eval_interval = 250
eval_iters = 20
device = "cpu"
