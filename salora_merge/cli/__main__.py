"""python -m salora_merge.cli"""

from salora_merge.cli import main

main()
