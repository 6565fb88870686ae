# moe_add_router_plugin(<name> SOURCES <c files...> [CUDA_SOURCES <cu files...>])
# Builds <name>.so in the plugin folder against the SDK headers only,
# exporting just the versioned entry symbol. CUDA sources are compiled when
# the CUDA backend is on (MOE_WITH_CUDA); the C file then sees MOE_WITH_CUDA
# defined and can point its `cuda` table at the kernels' implementation.
function(moe_add_router_plugin name)
  cmake_parse_arguments(P "" "" "SOURCES;CUDA_SOURCES" ${ARGN})
  set(srcs ${P_SOURCES})
  if(MOE_WITH_CUDA AND P_CUDA_SOURCES)
    list(APPEND srcs ${P_CUDA_SOURCES})
  endif()
  add_library(moe_plugin_${name} MODULE ${srcs})
  target_link_libraries(moe_plugin_${name} PRIVATE moe::sdk m)
  if(MOE_WITH_CUDA AND P_CUDA_SOURCES)
    target_link_libraries(moe_plugin_${name} PRIVATE CUDA::cudart_static)
    target_compile_definitions(moe_plugin_${name} PRIVATE MOE_PLUGIN_HAS_CUDA=1)
  endif()
  set_target_properties(moe_plugin_${name} PROPERTIES
    OUTPUT_NAME ${name}
    PREFIX ""
    C_VISIBILITY_PRESET hidden
    CUDA_VISIBILITY_PRESET hidden
    LIBRARY_OUTPUT_DIRECTORY ${MOE_PLUGIN_OUTPUT_DIR})
  install(TARGETS moe_plugin_${name} LIBRARY DESTINATION ${MOE_INSTALL_PLUGIN_DIR})
endfunction()
