# GPT-2-small width on GPUs, Huginn's layout (2 prelude, 4 core, 2 coda blocks), on FineWeb-Edu (GPT-2 BPE):
# python prepare_data.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --max_tokens=2_000_000_000
# torchrun --standalone --nproc_per_node=8 train.py config/gpt2_small.py --dataset=fineweb-edu_gpt2
out_dir = "out-gpt2-small"
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32      # 16 x 1024 x 32 = 524k tokens per step, over all GPUs
n_embd = 768
n_head = 12
intermediate_size = 2048
n_prelude = 2
n_core = 4
n_coda = 2
mean_recurrence = 8
backprop_depth = 4
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
weight_decay = 0.1
eval_interval = 1000
eval_iters = 100
device = "cuda"
dtype = "bfloat16"
compile = True
