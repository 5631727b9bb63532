"""Data curation: embed a pool, multi-level k-means with resampling, balanced hierarchical sampling.

    embed_pool(encoder, pool, out)            -> embeddings dir (memory-mapped float32 + index.parquet)
    cluster_embeddings(embeddings, cfg, out)  -> clusters dir (per-level centroids + assignments)
    sample_manifest(clusters, target, out)    -> parquet manifest (key, shard, cluster path) for the trainer
    random_manifest(embeddings, target, out)  -> the uniform-random baseline manifest of the same size
    evaluate_manifest(manifest, pool)         -> concept coverage / balance vs random (mini-world)
"""
from distill.curation.embed import EmbeddingSet, NonFiniteEmbeddingError, embed_pool
from distill.curation.evaluate import evaluate_manifest
from distill.curation.hierarchy import (ClusterConfig, LevelConfig, cluster_embeddings, load_cluster_config,
                                        load_hierarchy, run_hierarchy)
from distill.curation.kmeans import ClusterCountError, FaissEngine, TorchEngine, make_engine
from distill.curation.manifest import ManifestError, read_manifest, manifest_rows
from distill.curation.sample import hierarchical_sample, random_manifest, sample_manifest, water_fill

__all__ = ["EmbeddingSet", "NonFiniteEmbeddingError", "embed_pool", "evaluate_manifest", "ClusterConfig",
           "LevelConfig", "cluster_embeddings", "load_cluster_config", "load_hierarchy", "run_hierarchy",
           "ClusterCountError", "FaissEngine", "TorchEngine", "make_engine", "ManifestError", "read_manifest",
           "manifest_rows", "hierarchical_sample", "random_manifest", "sample_manifest", "water_fill"]
