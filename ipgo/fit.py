"""`python -m ipgo.fit --config configs/demo.yaml`: learn tokens (a thin launcher; see `ipgo.cli`)."""

from ipgo.cli import run

if __name__ == "__main__":
    run()
