-- The id of the event whose change the row (or tombstone) records, and that write's ZedToken.
--
-- A workflow replayed after its worker died can find its own event already applied (its steps
-- ran as local activities whose record was lost). With the event id on the row it answers
-- "applied", with the token, instead of "stale"; a duplicate delivered after the user's
-- workflow closed gets the same answer.
ALTER TABLE users ADD COLUMN applied_event text;
ALTER TABLE user_tombstones ADD COLUMN deleted_by_event text;
