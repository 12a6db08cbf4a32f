// placeholder, replaced by the trie builder
#pragma once
