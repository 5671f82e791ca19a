"""A local fsspec filesystem that counts the bytes and requests it serves: remote storage (a
bucket behind ranged reads) modelled on this machine, for `input.py` and its test.

  counting:///abs/path/to/prepared  ->  /abs/path/to/prepared, every read counted
"""
from fsspec import register_implementation
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "counting"


class CountingFileSystem(LocalFileSystem):
  protocol = (PROTOCOL,)
  bytes_read = 0
  requests = 0

  @classmethod
  def reset(cls):
    cls.bytes_read = cls.requests = 0

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    return super()._strip_protocol(path.removeprefix(f"{PROTOCOL}://"))

  def cat_file(self, path, start=None, end=None, **kwargs):
    data = super().cat_file(path, start=start, end=end, **kwargs)
    type(self).bytes_read += len(data)
    type(self).requests += 1
    return data


register_implementation(PROTOCOL, CountingFileSystem, clobber=True)


def url(directory) -> str:
  return f"{PROTOCOL}://{directory}"
