"""The saga's steps: App DB row activities and SpiceDB relationship activities."""

from activities.memberships import MembershipActivities
from activities.user_rows import UserRowActivities

__all__ = ["MembershipActivities", "UserRowActivities"]
