"""edge-fleet: publish models to a fleet over MQTT, roll out, roll back, watch."""
