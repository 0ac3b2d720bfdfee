/* file.h - read-only memory maps of model files.
 *
 * Model weights are never read whole into memory: the file is mapped and the
 * loaders convert tensor bytes straight from the map. A tk_mapped_file owns
 * its mapping and a copy of its path (used in every error message).
 */
#ifndef TK_FILE_H
#define TK_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "../core/status.h"

typedef struct {
    const uint8_t *data; /* [size] bytes, read-only; NULL when size is 0 */
    size_t size;
    char *path;
} tk_mapped_file;

tk_status tk_file_map(tk_mapped_file *out, const char *path);
void tk_file_unmap(tk_mapped_file *file);

#endif
