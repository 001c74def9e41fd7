"""Small utilities shared by every script: EasyDict, open_url, construct_class_by_name."""

from .util import EasyDict, UserError, make_cache_dir_path, open_url, construct_class_by_name, Logger, format_time  # noqa: F401
