"""doit's dependency database, made harmless. Freshness is ours (records and fingerprints); doit's
json backend only remembers what it ran. Its own dump rewrites the file in place, so a full disk
left an empty `.doit.db`, and every later run died with DatabaseException until it was deleted by
hand. This backend writes atomically, sets a damaged file aside instead of failing, and turns a
failed save into a warning (nothing it holds decides whether an artifact is fresh)."""
from __future__ import annotations

import os
import sys

from doit.dependency import DatabaseException, JsonDB

from buildplan.files import atomic_write


class SafeJsonDB(JsonDB):
    desc = "doit's json backend, written atomically; a damaged file is set aside, never fatal"

    def _load(self):
        try:
            db = super()._load()
        except (DatabaseException, OSError, ValueError):  # ValueError: bytes that are not UTF-8
            db = None
        if isinstance(db, dict):
            return db
        aside = f"{self.name}.damaged"
        try:
            os.replace(self.name, aside)
            where = f"set aside as {aside}"
        except OSError:
            where = "left in place"
        print(f"warning: doit's database {self.name} was damaged ({where}); starting a new one. "
              "Artifact freshness comes from the build records and is unaffected.", file=sys.stderr)
        return {}

    def dump(self):
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.name))):
            return  # artifacts/ does not exist: a read-only command ran; it creates nothing
        try:
            atomic_write(self.name, self.codec.encode(self._db), durable=False)
        except OSError as e:
            print(f"warning: could not save doit's database {self.name}: {e.strerror or e}. "
                  "Nothing built is lost: freshness comes from the build records.", file=sys.stderr)
