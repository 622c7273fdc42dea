"""The engine's policy, pure Python + NumPy: block manager, scheduler, sequences, step batches."""
