"""`make bench`: every benchmark, one after the other."""

from bench import memory, speed

if __name__ == "__main__":
    import sys

    sys.argv = [sys.argv[0]]
    speed.main()
    memory.main()
