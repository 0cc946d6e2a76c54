"""A finished job's result as files people look at: figures (the service's and the paper's), the Compare page's
figure, CSV, MessagePack and Parquet. Reads the core; knows nothing of the HTTP app."""
