"""Train the LLaMA architecture: python -m llama.train [config.py] [--key=value ...]

The same as `python train.py --arch=llama`: the loop itself is the top-level train.py.
"""

if __name__ == "__main__":
    if not __package__:  # python llama/train.py: the repository root is not on the path
        raise SystemExit("error: run it from the repository root as: python -m llama.train ...")
    import train
    train.main(arch="llama")
