"""nsdzarr: turn NSD-layout fMRI betas into training-ready Zarr v3 stores."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nsdzarr")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"
