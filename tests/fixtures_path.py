"""Where the shared sample uplinks live: `shared/fixtures/`, beside the repository checkout."""

from pathlib import Path

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
