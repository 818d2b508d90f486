-- Watch needs only changes after an instance exists: notify on UPDATE, not on INSERT.
-- A transaction that has called NOTIFY holds a database-wide lock through its commit (WAL flush
-- included), which serializes such commits; keeping NOTIFY out of CreateInstance's transaction
-- lets concurrent creates share WAL flushes (group commit).
DROP TRIGGER instances_notify ON instances;
CREATE TRIGGER instances_notify AFTER UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION setpoint_instance_notify();
