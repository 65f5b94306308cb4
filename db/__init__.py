"""Storage for the bot: per-chat settings and schedules in SQLAlchemy 2, with Alembic migrations."""
