# bench.py on one CUDA GPU at GPT-2-small width in Huginn's layout (2 prelude, 4 core, 2 coda blocks), bf16 and
# torch.compile of each block (a new depth must not recompile):
# python bench.py config/bench_gpu.py
vocab_size = 50304
block_size = 1024
batch_size = 16
n_embd = 768
n_head = 12
intermediate_size = 2048
n_prelude = 2
n_core = 4
n_coda = 2
mean_recurrence = 8
backprop_depth = 4
warmup_steps = 3
timed_steps = 10
decode_tokens = 128
mm_size = 8192
copy_mib = 2048
device = "cuda"
dtype = "bfloat16"
compile = True
