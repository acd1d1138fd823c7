"""entropy-pipeline: how a training step changed a language model's entropy.

The package follows the data flow: ``prompts`` → ``sample`` → ``score`` →
``stats`` → ``report``, with ``run`` chaining the stages and ``cli`` as a thin shell.
"""

# The one version string: pyproject.toml reads it (dynamic version), the wheel's
# metadata, `--version` and the run manifest all come from here.
__version__ = "0.1.0"
