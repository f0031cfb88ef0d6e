/* Durable files (file.c): the descriptor of an enos.file, for the worker thread's fsync. */
#ifndef ENOS_FILE_H
#define ENOS_FILE_H

#include "enos.h"

/* The descriptor of the enos.file at idx (raises when closed). */
int enos_file_fd(lua_State *L, int idx);

#endif
