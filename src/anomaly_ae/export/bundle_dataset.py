"""A Kedro dataset for an inspection bundle: a folder of files written as a whole."""

from __future__ import annotations

from anomaly_ae.datasets import FolderDataset
from anomaly_ae.export.folder import write_files


class BundleFolderDataset(FolderDataset):
    """``save({"model.onnx": bytes, "bundle.json": bytes})`` writes the files into a
    temporary sibling folder renamed into place (as
    :class:`anomaly_ae.datasets.ImageFolderDataset`), so a reader never sees a half-written
    bundle and, with ``versioned: true``, each run writes its own folder. ``load()`` returns
    the same dict of file contents.

    Example::

        "{namespace}.inspection_bundle":
          type: anomaly_ae.export.bundle_dataset.BundleFolderDataset
          path: data/06_models/{namespace}/inspection_bundle
          versioned: true
    """

    def load(self) -> dict[str, bytes]:
        folder = self._folder("run `kedro run --pipeline=export`")
        return {file.name: file.read_bytes() for file in sorted(folder.iterdir()) if file.is_file()}

    def save(self, data: dict[str, bytes]) -> None:
        write_files(self._get_save_path(), data)
