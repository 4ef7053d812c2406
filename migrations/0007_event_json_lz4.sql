-- The stored event (2–3 KB of JSON) is compressed when its row is written: pglz cost about
-- 40 µs of PostgreSQL's CPU per event in the worker's bench (docs/PERFORMANCE.md); lz4 does
-- the same job several times faster. Only new values use it; old ones stay readable. A server
-- built without lz4 keeps pglz (the migration must not stop the worker there).
DO $$
BEGIN
    ALTER TABLE ipn_event ALTER COLUMN event_json SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available on this server; event_json keeps pglz';
END
$$;
