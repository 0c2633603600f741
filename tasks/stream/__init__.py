"""The Ray side: the streamed pipeline of stage actors and the image writer, its Ray session and progress."""
