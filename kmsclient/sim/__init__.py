"""The fleet simulator: many licensing clients in virtual time, scenarios, timelines, charts."""
