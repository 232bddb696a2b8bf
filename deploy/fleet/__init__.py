"""Fleet telemetry on the host: the MQTT coordinator and its report, and a Mosquitto broker for the demo and tests."""
