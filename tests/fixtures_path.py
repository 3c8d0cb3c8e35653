"""Where the suite's own sample uplinks and product pages live, inside the repository.

`tests/fixtures/` holds sample uplinks (see its README for where each comes from) and
`tests/seeds/` the pages of ThingPark X IoT Flow's documentation whose JSON bodies must be
accepted as they are. Nothing outside the checkout is read.
"""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures"
SEEDS = TESTS / "seeds"
