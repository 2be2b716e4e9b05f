"""Rebuild examples/warehouse.db: a tiny shop warehouse for the quick start (deterministic)."""

from __future__ import annotations

import random
import sqlite3
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).parent
FIRST = ["ada", "alan", "grace", "linus", "margaret", "ken", "barbara", "dennis", "radia", "tim"]


def main() -> None:
    rng = random.Random(42)
    path = HERE / "warehouse.db"
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE users (user_id INTEGER PRIMARY KEY, email TEXT, plan TEXT NOT NULL);
        CREATE TABLE orders (
            order_id INTEGER PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(user_id),
            completed_at DATE NOT NULL,
            total_cents INTEGER NOT NULL
        );
        """
    )
    users = []
    for user_id in range(1, 201):
        name = f"{FIRST[user_id % len(FIRST)]}{user_id}"
        email: str | None = f"{name}@example.com"
        if user_id == 17:
            email = None  # no email on file: rejected with a reason
        elif user_id == 23:
            email = "not-an-email"  # rejected as invalid
        users.append((user_id, email, rng.choice(["free", "pro", "team"])))
    db.executemany("INSERT INTO users VALUES (?, ?, ?)", users)
    newest = date(2026, 11, 1)
    orders = []
    for order_id in range(1, 401):
        user_id = rng.randint(1, 200)
        completed = newest - timedelta(days=rng.randint(0, 120))
        orders.append((order_id, user_id, completed.isoformat(), rng.randint(500, 25000)))
    orders.append((401, 17, newest.isoformat(), 1200))
    orders.append((402, 23, newest.isoformat(), 1300))
    db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", orders)
    db.commit()
    db.close()


if __name__ == "__main__":
    main()
