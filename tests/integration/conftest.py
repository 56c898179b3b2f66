import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray per test module: 2 CPUs, bounded object store, no dashboard."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=300 * 2**20,
                 include_dashboard=False)
    yield
    ray.shutdown()
