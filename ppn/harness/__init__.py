"""The research harness: the main job, the benchmark, the baselines it compares
against (one-shot SparseGPT, Wanda, structured scores, fine-tuning) and the results
files. It uses the library; the library (`ppn` outside this package) never imports it.
"""
