import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from llama_jax.convert import main  # the `convert-weights` console script, runnable from a checkout
sys.exit(main())
