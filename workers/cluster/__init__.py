"""Weight clustering methods. Methods: kmeans (cluster.kmeans)."""
