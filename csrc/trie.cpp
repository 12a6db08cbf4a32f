#include "trie.h"
