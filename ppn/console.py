"""How ppn talks to a person: the `ppn` logger and progress bars.

Messages go to `logging.getLogger("ppn")` (and its children, `ppn.zoo` etc.): a
library adds no handler, so an application decides where they go; the `ppn`
command line prints them plainly on stderr. Progress bars are tqdm's: off when
the caller asks, when the `ppn` logger's own level is above INFO (`ppn --quiet`
sets WARNING), or when the environment says `TQDM_DISABLE=1`.
"""

from __future__ import annotations

import logging

LOGGER = "ppn"


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm bar (a widget in notebooks, text elsewhere).

    Args:
        iterable: what to iterate over, or None for a bar updated by hand.
        enabled: False turns the bar off.
        **kwargs: passed to tqdm (`desc`, `total`, `unit`, ...), except `disable`.

    Returns:
        A `tqdm.auto.tqdm`. An enabled bar leaves `disable` to tqdm: given none, tqdm
        takes it from `TQDM_DISABLE` as the environment held it when tqdm was imported.
    """
    from tqdm.auto import tqdm

    # A bar is INFO-level output. The logger's own level counts, not its effective one,
    # which inherits the root logger's default WARNING in every program that sets none.
    if not enabled or logging.getLogger(LOGGER).level > logging.INFO:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
