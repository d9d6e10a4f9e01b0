from edgefed.cli import main

main()
