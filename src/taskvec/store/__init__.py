"""The task-vector store: keep, share and equip task vectors (see docs/store.md).

:class:`~taskvec.store.store.Store` holds the catalogue and blobs; codecs are in
:mod:`~taskvec.store.codecs`, equipping a base in :mod:`~taskvec.store.equip`, bundles in
:mod:`~taskvec.store.bundle` and the ``taskvec store`` commands in :mod:`~taskvec.store.cli`.
"""

from taskvec.store.store import Store, store_dir

__all__ = ["Store", "store_dir"]
