"""SupSup inside the tools people already train with. Each module needs its optional extra:

- ``supsup.integrations.avalanche`` (``pip install 'supsup[avalanche]'``): the ``SupSup`` strategy, a
  ``SupSupModel`` that takes Avalanche's task labels, and a task-inference metric;
- ``supsup.integrations.lightning`` (``pip install 'supsup[lightning]'``): ``SupSupCallback``, which begins
  and ends a task around every ``Trainer.fit``, and ``SupSupModule``, a small ``LightningModule``.
"""


def missing_extra(package: str, extra: str, err: ImportError) -> ImportError:
    """The error an integration raises when its library is not installed, naming the extra to install."""
    return ImportError(f"supsup.integrations.{extra} needs {package}, which is not installed "
                       f"({err}); install it with: pip install 'supsup[{extra}]'")
