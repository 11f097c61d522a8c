"""Train the GPT architecture: python -m gpt.train [config.py] [--key=value ...]

The same as `python train.py --arch=gpt`: the loop itself is the top-level train.py.
"""

if __name__ == "__main__":
    if not __package__:  # python gpt/train.py: the repository root is not on the path
        raise SystemExit("error: run it from the repository root as: python -m gpt.train ...")
    import train
    train.main(arch="gpt")
