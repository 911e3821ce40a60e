import torch

# The suite's networks are tiny: one thread is faster than two fighting over a small CPU.
torch.set_num_threads(1)
