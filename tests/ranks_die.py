"""torchrun entry for tests/test_ranks.py: `malt_fast.cli`, except that the rank named by
MALT_TEST_DIE_RANK dies (os._exit, as a killed process: no cleanup, no message) when it is about
to write its tree number MALT_TEST_DIE_AFTER + 1 of this launch."""

import os
import sys

from malt_fast.malt import trees

if "MALT_TEST_DIE_RANK" in os.environ and os.environ.get("RANK") == os.environ[
        "MALT_TEST_DIE_RANK"]:
    after, written = int(os.environ["MALT_TEST_DIE_AFTER"]), []
    real_write = trees.TreeWriter.write

    def write(self, tree):
        if len(written) == after:
            os._exit(17)
        real_write(self, tree)
        written.append(tree["id"])

    trees.TreeWriter.write = write

from malt_fast.cli import main  # noqa: E402

sys.exit(main())
