"""tubelet's pipeline layer: Ray Data / Ray Train graphs, the CLI, configs and reports."""
