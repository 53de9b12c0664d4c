"""Op layer: kernel launches, torch.library ops and their autograd, one file per op family."""
